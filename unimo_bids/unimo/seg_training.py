"""Training the brain segmenter (segnet.BrainUNet) on synthetic composites and real stacks.

The segmenter must find a brain in data it has never seen: adult BOLD, T1w, DWI, and fetal
stacks from other scanners, where the brain is a small object inside the mother's body. So
most samples are synthetic and never repeat (domain randomisation, as in SynthSeg):

- **Brain.** A real brain (an :class:`~unimo_bids.unimo.training.Anatomy`: tissue maps and a
  brain mask) scaled by 0.35-0.85 (fetal brains) or 0.9-1.1 (adult), rotated uniformly on SO(3),
  sometimes mirrored, placed anywhere near the middle of the grid; a random intensity per tissue
  (grey, white, CSF). With thick slices the brain may also move between slices (per-slice
  in-plane shifts, as a fetus moves during a stack) while the background stays put.
- **Around it,** shells at random distances from the brain surface, their thickness varying
  around the head: extra-axial CSF, skull, and an outer layer, with blobs touching the head.
  Fetal-like (70 %): thin CSF and skull, a fluid rim 0-60 mm, bright or dark, sometimes on one
  side only, "fetal body" blobs (textured, up to the brain's size) in it, all inside a static
  smooth random texture of "maternal" tissue classes with distractor blobs and sometimes air
  around the body. Adult-like (30 %): thicker CSF, skull and scalp, face/neck-like blobs, in
  air or (rarely) texture. nilearn's MNI152 template is skull-stripped, so the head is
  synthetic.
- **Acquisition.** Gamma, a smooth multiplicative bias field, per-slice intensity jitter, thick
  slices (blur along one grid axis, sometimes decimation), Gaussian or Rician noise, and a
  field of view cut by a plane for some samples (zero beyond, like resampled real data).

The target is the brain mask moved the same way (inside the field of view). Real labelled
stacks (e.g. fetal stacks with manual masks), when given, make up ``real_fraction`` of the
samples: flips and axis swaps of the stack grid, small rotations, scaling, intensity
augmentation. Held-out stacks give the validation Dice of the full inference path
(segnet.segment_with_model, native grid, manual mask), next to the Dice on a fixed synthetic
validation set. The loss is binary cross-entropy plus soft Dice; Adam; the model with the best
validation score is kept.

Everything works on the working grid (segnet.SPACING_MM, 3 mm), where the network runs;
batches take random grid shapes (cubes, slabs and whole fields of view) so that instance norm
sees fields of view like those at inference (a network trained on small crops only segments
whole fetal stacks much worse). A step costs about 1.1 s on one CPU core. Sampling, initial
weights and data order all follow the seed. Pure torch / numpy / scipy: the caller loads
files.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import roma
import torch
import torch.nn.functional as F
from scipy import ndimage

from .geometry import centroids, voxel_sizes
from .resample import band_limit_sigma, gaussian_blur
from .shape import signed_distance
from .segnet import SPACING_MM, BrainUNet, normalise_intensities, segment_with_model
from .training import Anatomy, random_deformations

__all__ = [
    "GRID_SHAPES",
    "LARGE_GRID_SHAPES",
    "LabelledStack",
    "composite_samples",
    "dice",
    "segmentation_loss",
    "stack_samples",
    "train_segmenter",
]

# Working-grid shapes of training batches (3 mm voxels): cubes for heads and whole-brain
# coverage, slabs (thin along z) for thick-slice stacks, whose slice axis is a grid axis. The
# large ones are whole fields of view (a fetal stack is 120 x 120 x 25): instance norm and the
# amount of look-alike tissue around the brain depend on the field of view, and a network
# trained on small crops only segments much worse on a whole stack.
GRID_SHAPES = ((56, 56, 56), (64, 64, 40), (80, 80, 24), (72, 72, 72), (96, 96, 40),
               (120, 120, 24), (112, 96, 32))
# Added by ``--large-fields``: whole-body cubes (288-324 mm), as a stack resampled onto a large
# isotropic grid shows it (the slab a quarter of its height, empty space above and below; the
# packaged segmenter loses 0.06-0.09 Dice there, docs/benchmarks.md section 17).
LARGE_GRID_SHAPES = ((96, 96, 96), (108, 108, 72))
# Shape variation of the synthetic brains (``composite_samples``): per-axis stretch range, and
# the share of samples deformed by a smooth random field of up to this fraction of the brain's
# size (about 150 mm for the adult anatomy, times the sample's scale): up to 7.5 mm for an
# adult brain, 3-6 mm for fetal ones, the scale of the shape differences between subjects
# after a similarity alignment.
SHAPE_STRETCH = (0.88, 1.12)
SHAPE_WARP_SHARE = 0.8
SHAPE_WARP_FRACTION = 0.05
BRAIN_SIZE_MM = 150.0
# A batch holds about ``batch`` times this many voxels: large grids come fewer per batch, so
# that every step costs about the same.
_REFERENCE_VOXELS = 56 ** 3

# Anatomy band limits (mm in the anatomy's own space) used for scaled brains: a brain shrunk by
# s and sampled at 3 mm needs the band limit of 3 / s mm; the nearest of these is used (cached).
_ANATOMY_BANDS = (3.0, 3.75, 4.5, 5.5, 6.5, 7.5, 9.0)

# Channels of an Anatomy (unimo_bids.cli.train.mni_anatomy): grey, white, CSF, non-brain head.
_BRAIN_CHANNELS = 3


@dataclass
class LabelledStack:
    """A real image with a manual brain mask: (X, Y, Z) image, (X, Y, Z) bool mask, (4, 4)
    affine, and a name for logs."""

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    name: str = ""
    _prepared: dict = field(default_factory=dict, repr=False)

    def prepared(self, spacing_mm: float) -> dict:
        """Tensors for sampling at a working spacing: band-limited image and mask (1, 1, X, Y,
        Z), the mask's world centroid, the stack axes' orthonormal directions (cached)."""
        if spacing_mm not in self._prepared:
            image = torch.as_tensor(np.nan_to_num(np.asarray(self.image, np.float32)))
            sigma = band_limit_sigma(self.affine, spacing_mm)
            affine = np.asarray(self.affine, float)
            u, _, vt = np.linalg.svd(affine[:3, :3])
            self._prepared[spacing_mm] = {
                "image": gaussian_blur(image[None, None], sigma),
                "mask": torch.as_tensor(np.asarray(self.mask, np.float32))[None, None],
                "center": centroids(np.asarray(self.mask, bool), affine),
                "directions": u @ vt,
                "affine": affine,
            }
        return self._prepared[spacing_mm]


# --------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------


def _uniform(g: torch.Generator, low: float, high: float, size=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=g, dtype=torch.float64)


def _chance(g: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=g) < p)


@functools.lru_cache(maxsize=16)
def grid_indices(shape) -> torch.Tensor:
    """(X, Y, Z, 3) float32 voxel indices of a grid (cached: read only)."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def sample_through(volume: torch.Tensor, vox_maps: torch.Tensor, shape, offsets=None,
                   padding_mode: str = "zeros") -> torch.Tensor:
    """Trilinear samples of one volume through per-sample affine voxel maps, plus offsets.

    volume: (1, C, X, Y, Z); vox_maps: (B, 4, 4) target voxel index -> volume voxel index.
    offsets: optional (B, X', Y', Z', 3) displacements in target voxels, added before the map
        (e.g. per-slice motion of the sampled object).
    Returns (B, C, X', Y', Z') float32.
    """
    # Fold the voxel -> grid_sample normalisation (and its (z, y, x) order) into the map.
    sizes = torch.tensor([max(n - 1, 1) for n in volume.shape[2:]], dtype=torch.float64)
    to_unit = torch.eye(4, dtype=torch.float64)
    to_unit[:3, :3] = torch.diag(2.0 / sizes)
    to_unit[:3, 3] = -1.0
    maps = (to_unit @ vox_maps.to(torch.float64))[:, :3].flip(1).float()  # (B, 3, 4)
    index = grid_indices(tuple(int(n) for n in shape))[None]  # (1, X', Y', Z', 3)
    if offsets is not None:
        index = index + offsets.float()
    grid = index @ maps[:, None, None, :, :3].transpose(-1, -2) + maps[:, None, None, None, :, 3]
    batch = vox_maps.shape[0]
    return F.grid_sample(volume.expand(batch, -1, -1, -1, -1), grid, mode="bilinear",
                         padding_mode=padding_mode, align_corners=True)


# Margin (mm) added around the anatomy grid for the distance map, so that shells and their
# distances stay right where a shrunken anatomy's grid ends inside the working grid.
_PAD_MM = 100.0


def _padded_maps(anatomy: Anatomy) -> dict:
    """The anatomy's brain probability and the signed distance (mm, positive outside) to the
    surface of its filled 0.5-level mask, on its grid grown by ``_PAD_MM`` on each side:
    maps (1, 2, X+, Y+, Z+), inverse (4, 4) world -> padded voxel. Cached on the anatomy."""
    cache = anatomy.__dict__.setdefault("_segmenter_cache", {})
    if "padded" not in cache:
        affine = np.asarray(anatomy.affine, float)
        pad = np.ceil(_PAD_MM / voxel_sizes(affine)).astype(int)
        brain = np.pad(np.asarray(anatomy.brain, np.float32), [(p, p) for p in pad])
        mask = ndimage.binary_fill_holes(brain > 0.5)
        distance = signed_distance(mask, voxel_sizes(affine))
        padded_affine = affine.copy()
        padded_affine[:3, 3] = affine[:3, :3] @ (-pad) + affine[:3, 3]
        cache["padded"] = {
            "maps": torch.as_tensor(np.stack([brain, distance]).astype(np.float32))[None],
            "inverse": torch.as_tensor(np.linalg.inv(padded_affine)),
        }
    return cache["padded"]


def _smooth_noise(batch: int, channels: int, shape, cell: float, g: torch.Generator):
    """(B, C, X, Y, Z) smooth random fields ~N(0, 1): coarse noise (one value per ``cell``
    voxels) upsampled trilinearly."""
    coarse = [max(2, int(math.ceil(n / cell)) + 1) for n in shape]
    noise = torch.randn(batch, channels, *coarse, generator=g)
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)


def _ellipsoids(shape, centers, radii, rotations) -> torch.Tensor:
    """(K, X, Y, Z) soft (1-voxel edge) ellipsoids; centers, radii (K, 3) in voxels,
    rotations (K, 3, 3)."""
    index = grid_indices(tuple(shape))
    local = torch.einsum("kij,xyzkj->kxyzi", rotations.transpose(-1, -2).float(),
                         index[..., None, :] - centers.float())
    radii = radii.float()
    radius = (local / radii[:, None, None, None, :]).norm(dim=-1)
    # distance-like edge width of about one voxel at the surface
    return torch.sigmoid((1.0 - radius) * radii.min(dim=-1).values[:, None, None, None])


def _random_rotations(batch: int, g: torch.Generator) -> torch.Tensor:
    """(B, 3, 3) float64 uniform on SO(3)."""
    quat = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    return roma.unitquat_to_rotmat(quat / quat.norm(dim=-1, keepdim=True))


def _small_rotations(batch: int, g: torch.Generator, max_deg: float) -> torch.Tensor:
    axis = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    angle = _uniform(g, -max_deg, max_deg, (batch, 1)) * math.pi / 180.0
    return roma.rotvec_to_rotmat(axis / axis.norm(dim=-1, keepdim=True) * angle)


def _texture_background(shape, g: torch.Generator) -> torch.Tensor:
    """(X, Y, Z) static "maternal tissue": 3-8 smooth random classes with random intensities
    and fine texture, distractor blobs, and air around an ellipsoidal body for some samples.
    Drawn at half resolution (all of it is smooth on that scale) and upsampled: 8x cheaper."""
    full = tuple(int(n) for n in shape)
    shape = tuple(max(2, (n + 1) // 2) for n in full)
    classes = int(torch.randint(3, 9, (), generator=g))
    cell = float(_uniform(g, 2.0, 6.0))  # half-resolution voxels (12-36 mm)
    fields = _smooth_noise(1, classes, shape, cell, g)[0]
    labels = fields.argmax(dim=0)
    levels = torch.rand(classes, generator=g)
    image = levels[labels]
    texture = _smooth_noise(1, 1, shape, float(_uniform(g, 1.0, 2.0)), g)[0, 0]
    image = image * (1.0 + float(_uniform(g, 0.0, 0.3)) * texture)
    n_blobs = int(torch.randint(0, 7, (), generator=g))
    if n_blobs:
        size = torch.tensor(shape, dtype=torch.float64)
        centers = torch.rand(n_blobs, 3, generator=g, dtype=torch.float64) * size
        radii = _uniform(g, 1.0, 6.5, (n_blobs, 3))  # 6-40 mm at 3 mm
        blobs = _ellipsoids(shape, centers, radii, _random_rotations(n_blobs, g))
        for k in range(n_blobs):
            image = torch.lerp(image, torch.rand((), generator=g).expand_as(image), blobs[k])
    image = gaussian_blur(image[None, None], [float(_uniform(g, 0.2, 0.5))] * 3)[0, 0]
    if _chance(g, 0.5):  # air around the mother's body
        size = torch.tensor(shape, dtype=torch.float64)
        center = size * _uniform(g, 0.3, 0.7, (1, 3))
        radii = size * _uniform(g, 0.45, 0.9, (1, 3))
        body = _ellipsoids(shape, center, radii, _small_rotations(1, g, 30.0))[0]
        image = image * body
    image = F.interpolate(image[None, None].float(), size=full, mode="trilinear",
                          align_corners=True)[0, 0]
    return image.clamp_min(0)


def _shells(distance_mm: torch.Tensor, g: torch.Generator, background: torch.Tensor,
            adult: bool = False):
    """Paint the surroundings of the brain onto ``background`` (X, Y, Z) from the distance to
    the brain surface ``distance_mm`` (X, Y, Z; positive outside), each a soft shell of random
    thickness and intensity: an outer layer (fetal: a fluid rim, maybe one-sided; adult:
    scalp), blobs touching the head ("fetal body", face, neck), skull, extra-axial CSF."""
    shape = distance_mm.shape
    # thickness varies around the head: perturb the distance by a smooth field
    distance = distance_mm + float(_uniform(g, 0.0, 2.5)) * _smooth_noise(
        1, 1, shape, 6.0, g)[0, 0]
    out = background
    if adult:
        csf, skull = float(_uniform(g, 1.0, 5.0)), float(_uniform(g, 2.0, 8.0))
        fluid = float(_uniform(g, 3.0, 10.0))
    else:  # amniotic fluid: from a thin film to a uterus much larger than the head
        csf, skull = float(_uniform(g, 0.0, 4.0)), float(_uniform(g, 0.0, 4.0))
        fluid = float(_uniform(g, 0.0, 60.0))
    edge = 0.75  # mm, soft edges (already band-limited scale)

    def inside(limit_mm):
        return torch.sigmoid((limit_mm - distance) / edge)

    fluid_mask = inside(csf + skull + fluid)
    if not adult and _chance(g, 0.4):  # one side only: the head lies against the uterus
        normal = torch.randn(3, generator=g, dtype=torch.float64)
        normal = normal / normal.norm()
        index = grid_indices(tuple(shape))
        center = torch.tensor(shape, dtype=torch.float32) / 2.0
        side = ((index - center) @ normal.float()) * SPACING_MM
        fluid_mask = fluid_mask * torch.sigmoid((side - float(_uniform(g, -30, 30))) / 3.0)
    bright = _chance(g, 0.65)
    level = float(_uniform(g, 0.6, 1.0) if bright else _uniform(g, 0.0, 0.35))
    out = torch.lerp(out, torch.full_like(out, level), fluid_mask)
    inner = torch.nonzero(distance_mm < 0)
    if _chance(g, 0.7) and len(inner):
        # Objects next to the head or anywhere in the fluid, some as large as the brain and
        # textured (fetal body, limbs, placenta; face and neck for adults): the brain must be
        # told from them by what it looks like, not by being the blob in the fluid.
        n_blobs = int(torch.randint(1, 3 if adult else 7, (), generator=g))
        brain_center = inner.double().mean(0)
        direction = torch.randn(n_blobs, 3, generator=g, dtype=torch.float64)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        brain_radius = (3.0 * len(inner) / (4.0 * math.pi)) ** (1.0 / 3.0)  # voxels
        radii = brain_radius * _uniform(g, 0.25, 1.0, (n_blobs, 3))
        reach = (fluid / SPACING_MM) * _uniform(g, 0.0, 1.0, (n_blobs, 1))
        centers = brain_center + direction * (brain_radius + reach
                                              + 0.8 * radii.mean(-1, keepdim=True))
        blobs = _ellipsoids(shape, centers, radii, _random_rotations(n_blobs, g))
        for k in range(n_blobs):
            texture = float(_uniform(g, 0.0, 0.4)) * _smooth_noise(
                1, 1, shape, float(_uniform(g, 1.5, 4.0)), g)[0, 0]
            out = torch.lerp(out, torch.rand((), generator=g) + texture, blobs[k])
    out = torch.lerp(out, torch.full_like(out, float(torch.rand((), generator=g))),
                     inside(csf + skull))
    out = torch.lerp(out, torch.full_like(out, float(torch.rand((), generator=g))),
                     inside(csf))
    return out


def _acquisition(images: torch.Tensor, g: torch.Generator, slice_axis: int,
                 thick: bool) -> torch.Tensor:
    """Per-sample gamma, bias field, per-slice intensity jitter, thick-slice blur, noise.
    images: (B, 1, X, Y, Z) non-negative; returns the same shape."""
    batch, shape = images.shape[0], images.shape[2:]
    images = images / images.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
    gamma = torch.exp(0.35 * torch.randn(batch, 1, 1, 1, 1, generator=g))
    images = images.clamp_min(0) ** gamma
    bias = _smooth_noise(batch, 1, shape, float(_uniform(g, 16.0, 40.0)), g)
    images = images * torch.exp(float(_uniform(g, 0.0, 0.35)) * bias)
    if thick:
        view = [1, 1, 1, 1, 1]
        view[2 + slice_axis] = shape[slice_axis]
        jitter = 1.0 + float(_uniform(g, 0.0, 0.1)) * torch.randn(
            batch, *view[1:], generator=g)
        images = images * jitter
        sigma = [0.0, 0.0, 0.0]
        sigma[slice_axis] = float(_uniform(g, 0.3, 0.9))  # slices of 3-6.5 mm FWHM
        images = gaussian_blur(images, sigma)
        if _chance(g, 0.3):  # slice gap: keep every other plane, interpolate back
            kept = images.index_select(2 + slice_axis, torch.arange(0, shape[slice_axis], 2))
            images = F.interpolate(kept, size=tuple(shape), mode="trilinear",
                                   align_corners=True)
    noise = float(_uniform(g, 0.0, 0.08))
    first = noise * torch.randn(images.shape, generator=g)
    if _chance(g, 0.5):  # Rician magnitude noise
        second = noise * torch.randn(images.shape, generator=g)
        images = torch.sqrt((images + first) ** 2 + second ** 2)
    else:
        images = images + first
    return images


def _field_of_view(shape, g: torch.Generator, batch: int) -> torch.Tensor:
    """(B, 1, X, Y, Z) 1 inside the field of view: a third of the samples are cut by a random
    plane (zero beyond, as past the edge of a partial-coverage acquisition)."""
    fov = torch.ones(batch, 1, *shape)
    index = grid_indices(tuple(shape))
    center = torch.tensor(shape, dtype=torch.float32) / 2.0
    for b in range(batch):
        if _chance(g, 0.33):
            normal = torch.randn(3, generator=g, dtype=torch.float64)
            normal = (normal / normal.norm()).float()
            offset = float(_uniform(g, 5.0, 25.0))  # voxels from the centre
            fov[b, 0] = (((index - center) @ normal) <= offset).float()
    return fov


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def composite_samples(anatomy: Anatomy, shape, batch: int, g: torch.Generator,
                      spacing_mm: float = SPACING_MM, transforms: torch.Tensor | None = None,
                      scales=None, mode: str | None = None, slice_motion: bool = True,
                      fov_cuts: bool = True, shape_variation: bool = False):
    """Synthetic (image, brain mask) samples on a working grid of ``shape`` (3 ints).

    The working grid has voxel -> world affine diag(spacing) (origin 0). Each sample's brain
    is placed by a similarity transform, world (grid) -> world (anatomy),
    ``x -> c + R (x - p) / s``, with c the anatomy's brain centroid, R a rotation (maybe
    mirrored), p the brain's place on the grid, s the scale.

    transforms: optional (B, 4, 4) float64 to use instead of random ones (e.g. in tests);
    scales: optional (B,) scales matching them (for the shells' thicknesses in mm);
    mode: "fetal" (shells in maternal texture) or "head" (adult-like head in air); random if
        None;
    slice_motion: allow per-slice shifts of the brain in thick-slice samples;
    fov_cuts: allow field-of-view cuts (image and target zero beyond a plane).
    shape_variation: with random transforms, vary the one anatomy's shape, as brains differ
        from it (other subjects, fetal brains): a stretch of each grid axis by 0.88-1.12 and,
        for ``SHAPE_WARP_SHARE`` of the samples, a smooth random deformation
        (``training.random_deformations``) of up to ``SHAPE_WARP_FRACTION`` of the brain's
        size, image and target alike.
    Returns a dict: image (B, 1, X, Y, Z) raw intensities (normalise before the network),
    target (B, 1, X, Y, Z) float 0/1, transforms (B, 4, 4), scales (B,).
    """
    f64 = torch.float64
    shape = tuple(int(n) for n in shape)
    size_mm = torch.tensor(shape, dtype=f64) * spacing_mm
    random_pose = transforms is None
    if random_pose:
        adult = torch.rand(batch, generator=g) < 0.35
        scales = torch.where(adult, _uniform(g, 0.9, 1.1, (batch,)),
                             _uniform(g, 0.35, 0.85, (batch,)))
        rotation = _random_rotations(batch, g)
        mirror = torch.rand(batch, generator=g) < 0.5
        rotation = torch.where(mirror[:, None, None], rotation * torch.tensor(
            [-1.0, 1.0, 1.0], dtype=f64), rotation)
        place = size_mm * (0.5 + _uniform(g, -0.2, 0.2, (batch, 3)))
        center = torch.as_tensor(anatomy.center, dtype=f64)
        transforms = torch.eye(4, dtype=f64).repeat(batch, 1, 1)
        transforms[:, :3, :3] = rotation / scales[:, None, None]
        if shape_variation:  # divides column i by the stretch of grid axis i
            transforms[:, :3, :3] /= _uniform(g, *SHAPE_STRETCH, (batch, 3))[:, None, :]
        transforms[:, :3, 3] = center - (transforms[:, :3, :3] @ place[..., None])[..., 0]
    else:
        transforms = torch.as_tensor(transforms, dtype=f64)
        if scales is None:
            scales = 1.0 / torch.linalg.det(transforms[:, :3, :3]).abs() ** (1.0 / 3.0)
        scales = torch.as_tensor(scales, dtype=f64)
    grid_affine = torch.diag(torch.tensor([spacing_mm] * 3 + [1.0], dtype=f64))
    anatomy_inverse = torch.linalg.inv(torch.as_tensor(anatomy.affine, dtype=f64))
    vox_maps = anatomy_inverse @ transforms @ grid_affine

    slice_axis = int(np.argmin(shape)) if len(set(shape)) > 1 else int(
        torch.randint(3, (), generator=g))
    thick = _chance(g, 0.6)
    images, targets = [], []
    for b in range(batch):
        scale = float(scales[b])
        offsets = None
        if shape_variation and random_pose and _chance(g, SHAPE_WARP_SHARE):
            largest = SHAPE_WARP_FRACTION * BRAIN_SIZE_MM * scale
            field = random_deformations(1, shape, largest, g)[0]  # (3, X, Y, Z) mm
            offsets = (field.permute(1, 2, 3, 0) / spacing_mm).to(f64)[None]
        if slice_motion and thick and _chance(g, 0.3):
            # per-slice in-plane shifts (voxels) of the brain only; the background is static
            amplitude = float(_uniform(g, 0.3, 1.5))
            shifts = amplitude * torch.randn(shape[slice_axis], 3, generator=g, dtype=f64)
            shifts[:, slice_axis] = 0.0
            view = [1, 1, 1, 3]
            view[slice_axis] = shape[slice_axis]
            offsets = shifts.view(1, *view) + (0.0 if offsets is None else offsets)
        band = min(_ANATOMY_BANDS, key=lambda s: abs(s - spacing_mm / scale))
        tissues = sample_through(anatomy.band_limited(band)[None, :_BRAIN_CHANNELS],
                                 vox_maps[b:b + 1], shape, offsets)[0]
        # brain probability, and the distance to its surface in grid mm (anatomy mm * scale)
        padded = _padded_maps(anatomy)
        maps = sample_through(padded["maps"], padded["inverse"] @ transforms[b:b + 1]
                              @ grid_affine, shape, offsets, padding_mode="border")[0]
        brain, distance = maps[0], maps[1] * scale
        sample_mode = mode or ("head" if _chance(g, 0.3) else "fetal")
        levels = torch.rand(_BRAIN_CHANNELS, generator=g)
        brain_weight = tissues[:_BRAIN_CHANNELS].sum(0).clamp(0.0, 1.0)
        brain_image = torch.einsum("c,cxyz->xyz", levels, tissues[:_BRAIN_CHANNELS])
        if sample_mode == "head":  # an adult-like head in air (or, rarely, in texture)
            background = (_texture_background(shape, g) if _chance(g, 0.3)
                          else torch.zeros(shape))
            around = _shells(distance, g, background, adult=True)
        else:
            background = (_texture_background(shape, g) if _chance(g, 0.85)
                          else torch.zeros(shape))
            around = _shells(distance, g, background)
        images.append(brain_image + (1.0 - brain_weight) * around)
        targets.append((brain > 0.5).float())
    image = _acquisition(torch.stack(images)[:, None], g, slice_axis, thick)
    fov = _field_of_view(shape, g, batch) if fov_cuts else torch.ones_like(image)
    return {"image": image * fov, "target": torch.stack(targets)[:, None] * fov,
            "transforms": transforms, "scales": scales}


def stack_samples(stack: LabelledStack, shape, batch: int, g: torch.Generator,
                  spacing_mm: float = SPACING_MM):
    """Augmented samples of a real labelled stack on a working grid of ``shape``.

    The grid follows the stack's axes (as at inference), then: random flips of each axis, a
    swap of the two axes other than the slice axis, a small rotation (up to 15 degrees; any
    rotation for 1 sample in 8), a scale of 0.8-1.25 and a shift of the brain off-centre;
    intensities get gamma, bias field and noise. Returns a dict like :func:`composite_samples`
    (image, target).
    """
    f64 = torch.float64
    prep = stack.prepared(spacing_mm)
    shape = tuple(int(n) for n in shape)
    slice_axis = int(np.argmax(voxel_sizes(prep["affine"])))
    grid_slice_axis = int(np.argmin(shape)) if len(set(shape)) > 1 else 2
    directions = torch.as_tensor(prep["directions"], dtype=f64)
    # grid axis i looks along stack axis perm[i]: the stack's slice axis onto the grid's
    perm = [a for a in range(3) if a != slice_axis]
    if _chance(g, 0.5):
        perm = perm[::-1]
    perm.insert(grid_slice_axis, slice_axis)
    flips = torch.where(torch.rand(3, generator=g) < 0.5, -1.0, 1.0).to(f64)
    base = directions[:, perm] * flips  # (3, 3): columns = grid axes in world
    rotations = []
    for b in range(batch):
        if _chance(g, 0.125):
            rotations.append(_random_rotations(1, g)[0])
        else:
            rotations.append(_small_rotations(1, g, 15.0)[0])
    rotation = torch.stack(rotations)  # (B, 3, 3) world rotation about the brain centre
    scale = _uniform(g, 0.8, 1.25, (batch,))
    size_mm = torch.tensor(shape, dtype=f64) * spacing_mm
    place = size_mm * (0.5 + _uniform(g, -0.2, 0.2, (batch, 3)))
    center = torch.as_tensor(prep["center"], dtype=f64)
    # grid voxel v -> grid mm u = spacing v -> world x = c + R base (u - p) / s
    linear = rotation @ base / scale[:, None, None]  # (B, 3, 3), per mm of the grid
    transforms = torch.eye(4, dtype=f64).repeat(batch, 1, 1)
    transforms[:, :3, :3] = linear * spacing_mm
    transforms[:, :3, 3] = center - (linear @ place[..., None])[..., 0]
    vox_maps = torch.linalg.inv(torch.as_tensor(prep["affine"], dtype=f64)) @ transforms
    image = sample_through(prep["image"], vox_maps, shape)
    target = (sample_through(prep["mask"], vox_maps, shape) > 0.5).float()
    # intensity augmentation (positive data, as MR magnitudes)
    image = image.clamp_min(0)
    image = image / image.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
    image = image ** torch.exp(0.3 * torch.randn(batch, 1, 1, 1, 1, generator=g))
    bias = _smooth_noise(batch, 1, shape, float(_uniform(g, 16.0, 40.0)), g)
    image = image * torch.exp(float(_uniform(g, 0.0, 0.3)) * bias)
    inside = (image > 0).float()
    image = image + inside * float(_uniform(g, 0.0, 0.04)) * torch.randn(image.shape, generator=g)
    return {"image": image, "target": target}


# --------------------------------------------------------------------------------------------
# Loss and metrics
# --------------------------------------------------------------------------------------------


def dice(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B,) Dice of (B, ...) masks or probabilities (1 when both are empty)."""
    p = prediction.reshape(prediction.shape[0], -1).float()
    t = target.reshape(target.shape[0], -1).float()
    return (2.0 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus (1 - soft Dice), averaged over the batch: scalar.
    BCE gets every voxel right on average; Dice keeps a small brain from drowning in the
    background."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce + (1.0 - dice(torch.sigmoid(logits), target)).mean()


def native_dice(mask: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two bool arrays."""
    mask, reference = np.asarray(mask, bool), np.asarray(reference, bool)
    total = mask.sum() + reference.sum()
    return float(2.0 * (mask & reference).sum() / total) if total else 1.0


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _draw_batch(anatomies, stacks, batch, g, real_fraction, spacing_mm, shapes,
                shape_variation=False):
    """One training batch (images normalised, targets) on a random grid shape: ``batch``
    samples, fewer (at least one) of grids larger than ``_REFERENCE_VOXELS``."""
    shape = shapes[int(torch.randint(len(shapes), (), generator=g))]
    batch = max(1, min(batch, int(round(batch * _REFERENCE_VOXELS / float(np.prod(shape))))))
    real = int((torch.rand(batch, generator=g) < real_fraction).sum()) if stacks else 0
    parts = []
    if batch - real > 0:
        anatomy = anatomies[int(torch.randint(len(anatomies), (), generator=g))]
        parts.append(composite_samples(anatomy, shape, batch - real, g, spacing_mm,
                                       shape_variation=shape_variation))
    for _ in range(real):
        stack = stacks[int(torch.randint(len(stacks), (), generator=g))]
        parts.append(stack_samples(stack, shape, 1, g, spacing_mm))
    image = torch.cat([p["image"] for p in parts])
    target = torch.cat([p["target"] for p in parts])
    return normalise_intensities(image[:, 0])[:, None], target


def _synthetic_validation(anatomies, count, seed, spacing_mm, shape_variation=False):
    """Fixed synthetic validation batches (normalised images, targets) on 64^3 grids."""
    g = torch.Generator().manual_seed(seed + 7919)
    batches = []
    for k in range(count):
        sample = composite_samples(anatomies[k % len(anatomies)], (64, 64, 64), 1, g,
                                   spacing_mm, shape_variation=shape_variation)
        batches.append((normalise_intensities(sample["image"][:, 0])[:, None],
                        sample["target"]))
    return batches


def evaluate_segmenter(model, synthetic, stacks) -> dict:
    """Validation: mean Dice on fixed synthetic samples (threshold 0.5 on the grid) and the
    Dice of segment_with_model on each held-out stack against its manual mask (native grid)."""
    model.eval()
    with torch.no_grad():
        synthetic_dice = [float(dice(torch.sigmoid(model(image)) > 0.5, target).mean())
                          for image, target in synthetic]
    result = {"synthetic_dice": float(np.mean(synthetic_dice)) if synthetic_dice else None}
    per_stack = {}
    for stack in stacks:
        mask = segment_with_model(model, stack.image, stack.affine)
        per_stack[stack.name] = native_dice(mask, stack.mask)
    result["stack_dice"] = per_stack
    result["score"] = _score(result)
    return result


def _score(result: dict) -> float:
    """Model selection: the mean of the synthetic Dice and the mean held-out stack Dice (one
    real subject alone would select for that subject)."""
    values = [result["synthetic_dice"]] if result["synthetic_dice"] is not None else []
    if result["stack_dice"]:
        values.append(float(np.mean(list(result["stack_dice"].values()))))
    return float(np.mean(values)) if values else 0.0


def train_segmenter(anatomies, fetal_train=(), fetal_val=(), minutes: float = 30.0,
                    batch: int = 2, lr: float = 2e-3, seed: int = 0, device="cpu",
                    progress=print, *, max_steps: int | None = None,
                    real_fraction: float = 0.2, widths=(8, 16, 32, 64),
                    spacing_mm: float = SPACING_MM, shapes=GRID_SHAPES,
                    validate_every_s: float = 150.0, synthetic_validation: int = 12,
                    log_every_s: float = 30.0, initial_state: dict | None = None,
                    shape_variation: bool = False):
    """Train a BrainUNet from scratch; returns (best model on the CPU, summary dict).

    anatomies: list of Anatomy; fetal_train, fetal_val: lists of LabelledStack (real stacks
        for training samples / held-out validation; may be empty).
    minutes: wall-time budget (validation included); max_steps: optional step limit (with it,
        and no time limit reached, a run is exactly reproducible for a seed: sampling, the
        initial weights and the data order all come from ``seed``).
    initial_state: optional state_dict (same ``widths``) to continue training from.
    shape_variation: stretch and warp the synthetic brains (``composite_samples``), in
        training and in the synthetic validation.
    The learning rate decays by cosine over the budget (steps when ``max_steps`` is given,
    else wall time). ``progress`` receives one line per ~``log_every_s`` seconds and per
    validation. The model kept is the one with the best validation score (mean of the
    synthetic Dice and the mean held-out stack Dice), checked every ``validate_every_s``
    seconds and at the end.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = BrainUNet(widths, spacing_mm)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model = model.to(device)
    fetal_train, fetal_val = list(fetal_train), list(fetal_val)
    synthetic = [(x.to(device), y.to(device)) for x, y in
                 _synthetic_validation(anatomies, synthetic_validation, seed, spacing_mm,
                                       shape_variation)]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    budget = minutes * 60.0
    start = time.monotonic()
    history, best, best_state = [], None, None
    steps, running, last_log, last_val = 0, None, start, start

    def validate():
        nonlocal best, best_state
        result = evaluate_segmenter(model, synthetic, fetal_val)
        result.update({"step": steps, "seconds": round(time.monotonic() - start, 1)})
        history.append(result)
        stacks = ", ".join(f"{k} {v:.3f}" for k, v in result["stack_dice"].items())
        progress(f"validation at step {steps}: synthetic Dice {result['synthetic_dice']:.3f}"
                 + (f", held-out stacks: {stacks}" if stacks else "")
                 + f", score {result['score']:.3f}")
        if best is None or result["score"] > best["score"]:
            best, best_state = result, copy.deepcopy(model.state_dict())
        model.train()

    validate()  # the untrained network, for reference
    model.train()
    first_loss = None
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= budget or (max_steps is not None and steps >= max_steps):
            break
        fraction = steps / max_steps if max_steps else elapsed / budget
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(fraction, 1))))
        image, target = _draw_batch(anatomies, fetal_train, batch, g, real_fraction,
                                    spacing_mm, shapes, shape_variation)
        logits = model(image.to(device))
        loss = segmentation_loss(logits, target.to(device))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        steps += 1
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        running = value if running is None else 0.95 * running + 0.05 * value
        now = time.monotonic()
        if now - last_log >= log_every_s:
            progress(f"step {steps}: loss {running:.3f} (running mean), "
                     f"{now - start:.0f} s of {budget:.0f} s")
            last_log = now
        if now - last_val >= validate_every_s:
            validate()
            last_val = time.monotonic()
    validate()
    model.load_state_dict(best_state)
    model = model.cpu().eval()
    summary = {
        "steps": steps, "seconds": round(time.monotonic() - start, 1), "batch": batch,
        "learning_rate": lr, "seed": seed, "device": str(device), "real_fraction":
        real_fraction if fetal_train else 0.0, "grid_shapes": [list(s) for s in shapes],
        "shape_variation": shape_variation,
        "spacing_mm": spacing_mm, "widths": list(widths),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_stacks": [s.name for s in fetal_train], "val_stacks": [s.name for s in fetal_val],
        "synthetic_validation_samples": len(synthetic), "first_loss": first_loss,
        "final_loss": running,
        "best": best, "history": history,
    }
    return model, summary
