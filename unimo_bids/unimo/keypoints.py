"""Equivariant keypoint encoder: working grid, steerable network, keypoints, rigid solve.

The encoder runs on an isotropic cubic working grid in world space (``working_grid``), so that
anisotropic voxels and oblique acquisitions look alike to the network. Its layers are e3nn's
steerable voxel convolutions (kernels = learned radial profiles times spherical harmonics on the
voxel lattice) with gated nonlinearities on scalar (0e) and vector (1o) features. It ends in K
non-negative scalar maps; each map's centre of mass is a keypoint in world mm (``keypoints``).

Symmetry. On a cubic grid of odd size N, the 48 symmetries of the voxel lattice about the grid
centre (the 24 rotations, and their mirror images) map the lattice, the zero padding and the
stride-2 sampling (voxels 0, 2, ..., N - 1) onto themselves, and every kernel is built to commute
with them, so keypoints rotate with the input exactly, up to float rounding. Other rotations are
equivariant only as far as the lattice resolves the kernels (measured in tests/test_keypoints.py).
Each stride-2 layer therefore needs an odd size at its input: N odd for one such layer (the
presets), N = 4k + 1 for two.

Zero input gives zero output: no layer has a bias, silu(0) = 0, the gates multiply vectors
that are 0, and the head is a ReLU. Empty background thus carries no keypoint mass, and keypoints
follow the anatomy rather than the grid centre (a softplus head would add a constant floor).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn.models.v2104.voxel_convolution import Convolution

from .geometry import centroids, grid_center, homogeneous, voxel_sizes
from .resample import band_limit_sigma, gaussian_blur, resample, voxel_map
from .rotations import weighted_kabsch

__all__ = [
    "PRESETS",
    "KeypointEncoder",
    "GatedBlock",
    "SteerableConv3d",
    "inference_precision",
    "keypoints",
    "pair_weights",
    "preset",
    "rigid_from_keypoints",
    "shape_input",
    "spherical_window",
    "to_working_grid",
    "working_grid",
]

# Working grid and network per device (equivariance errors: tests/test_keypoints.py).
# CPU: 49^3 voxels of 4 mm (196 mm, a whole head); two stride-2 layers (49 -> 25 -> 13, so each
#   is symmetric about the centre), 5^3 then 3^3 kernels: receptive field ~56 mm in radius;
#   11,096 parameters; a batch of 8 takes 0.1 s forward, 0.4 s forward + backward on 2 cores.
# GPU: 65^3 voxels of 3 mm (65 -> 33 -> 17), wider layers.
PRESETS = {
    "cpu": {"size": 49, "spacing_mm": 4.0,
            "encoder": {"widths": (8, 16, 16), "strides": (2, 2, 1), "diameter": (5, 5, 3, 3)}},
    "cuda": {"size": 65, "spacing_mm": 3.0,
             "encoder": {"widths": (16, 32, 32), "strides": (2, 2, 1),
                         "diameter": (5, 5, 3, 3)}},
}


def preset(device) -> dict:
    """The ``PRESETS`` entry for a torch device (or its name): "cuda" for GPUs, else "cpu"."""
    return PRESETS["cuda" if torch.device(device).type == "cuda" else "cpu"]


# --------------------------------------------------------------------------------------------
# Working grid
# --------------------------------------------------------------------------------------------


def working_grid(shape, affine, spacing_mm: float | None, size: int, mask=None):
    """Isotropic cubic grid in world space, axis-aligned with RAS, centred on the image.

    shape, affine: the image grid (X, Y, Z) and its voxel -> world (4, 4) affine.
    spacing_mm: isotropic voxel size of the working grid; None picks the spacing at which the
        cube spans the image's world bounding box (its longest side).
    size: N voxels per side (odd, for the encoder's stride-2 layer; see the module note).
    mask: optional (X, Y, Z) bool mask: centre the grid on its world centroid instead of on the
        image centre (the brain, not the field of view, then sits in the middle).
    Returns (grid_affine (4, 4) float64, grid_shape (N, N, N)); voxel (N-1)/2 is the centre.
    """
    affine = np.asarray(affine, dtype=float)
    if mask is not None and np.asarray(mask).any():
        center = centroids(mask, affine)
    else:
        center = grid_center(shape, affine)
    if spacing_mm is None:
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij"))
        corners = corners.reshape(3, -1).T @ affine[:3, :3].T
        spacing_mm = float((corners.max(0) - corners.min(0)).max()) / max(size - 1, 1)
    grid_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    grid_affine[:3, 3] = center - spacing_mm * (size - 1) / 2.0
    return grid_affine, (int(size),) * 3


def to_working_grid(
    volumes: torch.Tensor,
    affine,
    grid_affine,
    grid_shape,
    transforms: torch.Tensor | None = None,
    antialias: bool = True,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Resample a batch of volumes onto a working grid, once (trilinear).

    volumes: (B, C, X, Y, Z) on the grid ``affine`` (4, 4), shared by the batch.
    transforms: optional (B, 4, 4) tensor or array, world (grid) -> world (volume) as in
        geometry; the identity when None. E.g. a known motion, to build a moved copy with a
        single interpolation.
    antialias: blur first (per axis, in the volume's own voxels) so that the coarser working grid
        does not alias; anisotropic voxels get less blur along their long axis.
    padding_mode: ``"zeros"`` for intensities, ``"border"`` for maps that do not vanish outside.
    Returns (B, C, N, N, N) in the dtype of volumes.
    """
    device, dtype = volumes.device, volumes.dtype
    affine_t = torch.as_tensor(np.asarray(affine, dtype=float), device=device)
    grid_t = torch.as_tensor(np.asarray(grid_affine, dtype=float), device=device)
    if transforms is None:
        transforms = torch.eye(4, dtype=torch.float64, device=device).expand(
            volumes.shape[0], 4, 4)
    if antialias:
        # Same band limit as the registration pyramid.
        volumes = gaussian_blur(volumes, band_limit_sigma(affine, voxel_sizes(grid_affine).min()))
    transforms = torch.as_tensor(transforms, dtype=torch.float64, device=device)
    maps = voxel_map(transforms, affine_t, grid_t)
    return resample(volumes, maps, tuple(grid_shape), padding_mode=padding_mode).to(dtype)


def shape_input(distance_mm: torch.Tensor, clip_mm: float = 20.0) -> torch.Tensor:
    """Encoder input from a signed distance map (negative inside, mm): clamp(clip - d, 0, 2 clip).

    It is 0 from ``clip_mm`` outside the boundary on, so empty space carries no keypoint mass
    (a raw distance map grows towards the field-of-view edges), and grows into the brain.
    """
    return (clip_mm - distance_mm).clamp(0.0, 2.0 * clip_mm)


def spherical_window(size: int, taper: float = 2.0, dtype=torch.float32, device=None):
    """(N, N, N) ball of radius (N-1)/2 about the grid centre with a cosine edge ``taper`` voxels
    wide. It is invariant under the lattice symmetries and, unlike the cube, under every rotation,
    so what the network sees does not depend on the cube's corners."""
    axis = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    radius = torch.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2
                        + axis[None, None, :] ** 2)
    outer = (size - 1) / 2.0
    ramp = ((outer - radius) / max(taper, 1e-6)).clamp(0.0, 1.0)
    return (0.5 - 0.5 * torch.cos(math.pi * ramp)).to(dtype)


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class SteerableConv3d(Convolution):
    """e3nn's steerable voxel convolution as one dense conv3d, with an optional stride.

    The kernel is sum_r w_r phi_r(|x|) Y(x/|x|) on the (2r+1)^3 lattice of ``diameter`` voxels,
    coupled to the features by a tensor product (e3nn builds it). e3nn adds its equivariant
    self-connection (a Linear) separately; its radial basis is 0 at the centre tap, so the
    Linear's matrix is written into that tap instead: the same map, in one convolution, without
    e3nn's channels-last Linear over every voxel.

    With stride 2 the outputs sit on voxels 0, 2, ..., N - 1, symmetric about the centre only
    when N is odd. The dense kernel is cached while no gradient is needed (inference).

    ``inference_dtype`` (None: the input's dtype) is the dtype of the convolution itself when
    no gradient is needed (see ``devices.fast_inference_dtype``); its output is cast back.

    Input (B, irreps_in.dim, X, Y, Z) -> (B, irreps_out.dim, X', Y', Z').
    """

    def __init__(self, irreps_in, irreps_out, lmax: int = 2, diameter: float = 5.0,
                 num_radial_basis: int = 3, stride: int = 1):
        super().__init__(irreps_in, irreps_out, o3.Irreps.spherical_harmonics(lmax), diameter,
                         num_radial_basis, steps=(1.0, 1.0, 1.0), stride=stride)
        self.stride = stride
        self.inference_dtype = None
        self._cache = None

    def dense_kernel(self) -> torch.Tensor:
        """(out, in, k, k, k) kernel including the self-connection at the centre tap."""
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self.parameters())
        if torch.is_grad_enabled() or self._cache is None or self._cache[0] != key:
            kernel = self.kernel()
            eye = torch.eye(self.irreps_in.dim, dtype=kernel.dtype, device=kernel.device)
            centre = tuple(n // 2 for n in kernel.shape[2:])
            tap = torch.zeros_like(kernel)
            tap[(slice(None), slice(None)) + centre] = self.sc(eye).T
            kernel = kernel + tap
            if torch.is_grad_enabled():
                return kernel
            self._cache = (key, kernel)
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        if s > 1 and any(n % s != 1 for n in x.shape[2:]):
            raise ValueError(f"stride-{s} layer needs sizes = 1 mod {s} to stay symmetric about "
                             f"the grid centre, got {tuple(x.shape[2:])}")
        dtype = x.dtype
        if self.inference_dtype is not None and not torch.is_grad_enabled():
            dtype = self.inference_dtype
        return F.conv3d(x.to(dtype), self.dense_kernel().to(dtype), **self.kwargs).to(x.dtype)


@contextlib.contextmanager
def inference_precision(module: torch.nn.Module, dtype: torch.dtype):
    """Run the steerable convolutions of ``module`` in ``dtype`` inside the block (no-grad
    passes only; the previous setting is restored after)."""
    convs = [m for m in module.modules() if isinstance(m, SteerableConv3d)]
    previous = [conv.inference_dtype for conv in convs]
    for conv in convs:
        conv.inference_dtype = dtype
    try:
        yield module
    finally:
        for conv, old in zip(convs, previous):
            conv.inference_dtype = old


class GatedBlock(torch.nn.Module):
    """Gated nonlinearity on channels-first features laid out as e3nn irreps
    ``w x 0e (scalars) + w x 0e (gates) + w x 1o (vectors)``: silu on the scalars, each vector
    scaled by the sigmoid of its gate (a norm-free, hence equivariant, nonlinearity; e3nn's Gate
    does the same on channels-last tensors). (B, 5w, ...) -> (B, 4w, ...) = w x 0e + w x 1o."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.irreps_in = o3.Irreps(f"{width}x0e + {width}x0e + {width}x1o")
        self.irreps_out = o3.Irreps(f"{width}x0e + {width}x1o")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.width
        scalars, gates, vectors = x[:, :w], x[:, w:2 * w], x[:, 2 * w:]
        vectors = vectors.unflatten(1, (w, 3)) * torch.sigmoid(gates)[:, :, None]
        return torch.cat([F.silu(scalars), vectors.flatten(1, 2)], dim=1)


class KeypointEncoder(torch.nn.Module):
    """E(3)-equivariant keypoint encoder: scalar volumes -> K non-negative maps.

    in_channels: scalar input channels (1: intensity, or a shape map).
    num_keypoints: K output maps.
    widths: per layer, the number of scalars (and as many vectors) it outputs.
    strides: per layer, 1 or 2 (each 2 halves the resolution; see the module note on odd sizes).
    lmax: spherical-harmonic degree of the kernels.
    diameter: kernel diameter in voxels (5 -> 5^3 lattice), one for all layers or one per layer
        and a last one for the head.
    num_radial: radial basis functions per kernel.
    window: multiply the input by ``spherical_window`` before the first layer.
    normalise: divide each input volume by its RMS over the grid (a rotation-invariant scale), so
        the network sees the same range whatever the scanner units.

    forward: (B, C, N, N, N) -> (B, K, n, n, n) maps with n = (N - 1) / prod(strides) + 1 on the
    grid ``maps_affine(grid_affine)``. ``keypoints`` turns them into world points.
    """

    def __init__(self, in_channels: int = 1, num_keypoints: int = 16, widths=(4, 8),
                 strides=(2, 1), lmax: int = 2, diameter=(5, 3, 3), num_radial: int = 3,
                 window: bool = True, normalise: bool = True):
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError("widths and strides need one entry per layer")
        self.strides = tuple(int(s) for s in strides)
        self.window = window
        self.normalise = normalise
        diameters = (tuple(diameter) if isinstance(diameter, (tuple, list))
                     else (diameter,) * (len(widths) + 1))
        if len(diameters) != len(widths) + 1:
            raise ValueError("diameter needs one entry per layer and one for the head")
        irreps = o3.Irreps(f"{in_channels}x0e")
        convs, gates = [], []
        for width, stride, diam in zip(widths, self.strides, diameters):
            gate = GatedBlock(width)
            convs.append(SteerableConv3d(irreps, gate.irreps_in, lmax, diam, num_radial, stride))
            gates.append(gate)
            irreps = gate.irreps_out
        self.convs = torch.nn.ModuleList(convs)
        self.gates = torch.nn.ModuleList(gates)
        self.head = SteerableConv3d(irreps, f"{num_keypoints}x0e", lmax, diameters[-1],
                                    num_radial)

    @property
    def scale(self) -> int:
        """Voxel size of the output maps, in input voxels."""
        return math.prod(self.strides)

    def maps_affine(self, grid_affine) -> np.ndarray:
        """(4, 4) voxel -> world affine of the output maps (output voxel j = input voxel sj)."""
        return np.asarray(grid_affine, dtype=float) @ np.diag([self.scale] * 3 + [1.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(set(x.shape[2:])) != 1:
            raise ValueError(f"the encoder needs a cubic working grid, got {tuple(x.shape[2:])}")
        if self.window:
            x = x * spherical_window(x.shape[-1], dtype=x.dtype, device=x.device)
        if self.normalise:
            rms = x.pow(2).mean(dim=(2, 3, 4), keepdim=True).sqrt()
            x = x / rms.clamp_min(1e-6)
        for conv, gate in zip(self.convs, self.gates):
            x = gate(conv(x))
        return F.relu(self.head(x))

    def keypoints(self, x: torch.Tensor, grid_affine) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, N, N, N) on ``grid_affine`` -> points (B, K, 3) world mm, weights (B, K)."""
        affine = torch.as_tensor(self.maps_affine(grid_affine), device=x.device)
        return keypoints(self(x), affine)


# --------------------------------------------------------------------------------------------
# Keypoints and the rigid solve
# --------------------------------------------------------------------------------------------


def keypoints(
    feature_maps: torch.Tensor, grid_affine, eps: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of mass of non-negative maps, in world mm.

    feature_maps: (B, K, X, Y, Z) >= 0 on the voxel grid ``grid_affine`` (4, 4).
    Coordinates are taken about the grid centre ((n-1)/2 per axis), where the lattice symmetries
    act, and in float64, then mapped to world mm through the affine.
    eps: a prior mass of eps per voxel placed at the grid centre, so that an empty map, and its
        gradient, stay finite (its point is the grid centre). It moves a map of mean value m by
        eps / (m + eps) of its distance to the centre, and keeps the lattice symmetries exact.
    Returns points (B, K, 3) float64 and weights (B, K): the mean map value (mass / voxels), 0 for
    an empty map.
    """
    maps = feature_maps.to(torch.float64)
    shape = maps.shape[2:]
    voxels = math.prod(shape)
    mass = maps.sum(dim=(2, 3, 4))
    denominator = (mass + eps * voxels).clamp_min(torch.finfo(torch.float64).tiny)
    centred = []
    for axis, n in enumerate(shape):
        others = tuple(2 + a for a in range(3) if a != axis)
        marginal = maps.sum(dim=others)  # (B, K, n)
        coord = torch.arange(n, dtype=torch.float64, device=maps.device) - (n - 1) / 2.0
        centred.append((marginal * coord).sum(-1) / denominator)
    centred = torch.stack(centred, dim=-1)  # (B, K, 3) voxels about the centre
    affine = torch.as_tensor(grid_affine, dtype=torch.float64, device=maps.device)
    centre_vox = torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64,
                              device=maps.device)
    centre = affine[:3, :3] @ centre_vox + affine[:3, 3]
    points = centred @ affine[:3, :3].T + centre
    return points, mass / voxels


def pair_weights(weights_fixed: torch.Tensor, weights_moving: torch.Tensor) -> torch.Tensor:
    """(B, K) weight of each keypoint pair: the product (a map empty in either image drops out)."""
    return weights_fixed * weights_moving


def rigid_from_keypoints(
    kp_fixed: torch.Tensor, kp_moving: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Rigid transform from matched keypoints, geometry's convention.

    kp_fixed: (B, K, 3) keypoints of the reference, kp_moving: (B, K, 3) of the moving volume,
    world mm; weights: (B, K) or None (see ``pair_weights``).
    Returns (B, 4, 4) float64 M with M kp_fixed ~ kp_moving: reference world -> moving world.
    """
    rotation, translation = weighted_kabsch(kp_fixed, kp_moving, weights)
    return homogeneous(rotation, translation)
