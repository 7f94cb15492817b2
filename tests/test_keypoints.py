"""Equivariant keypoint encoder (unimo_bids.unimo.keypoints) on a real brain, random weights.

Measured with the CPU preset's network (seeds 0-2, MNI152 2 mm template):
- lattice symmetries (24 grid rotations, 24 mirror images): keypoints move with the input to
  within 1e-6 mm in float64 (rounding); in float32 within 2e-5 mm for every map holding at least
  1% of the largest map's mass (rounding; up to 3e-3 mm on maps of almost no mass);
- 8 random continuous rotations on the 49^3 grid of 4 mm, the brain resampled once per pose:
  0.42-1.15 mm mean keypoint error weighted by mass with random weights (seeds 0-2; the two
  stride-2 layers end on 16 mm voxels, coarser than the lattice the kernels are sampled on),
  0.13 mm with the packaged (trained) image encoder, whose keypoints give the rotation within
  1.1-3.8 degrees by Kabsch (the network's end-to-end accuracy: tests/test_network.py and
  docs/benchmarks.md).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import roma
import torch
from conftest import coarse_grid
from e3nn.nn.models.v2104.voxel_convolution import Convolution

from unimo_bids.unimo.devices import fast_inference_dtype
from unimo_bids.unimo.geometry import grid_center
from unimo_bids.unimo.keypoints import (
    PRESETS,
    KeypointEncoder,
    SteerableConv3d,
    inference_precision,
    keypoints,
    pair_weights,
    preset,
    rigid_from_keypoints,
    shape_input,
    spherical_window,
    to_working_grid,
    working_grid,
)
from unimo_bids.unimo.resample import resample, voxel_map

CPU = PRESETS["cpu"]


@pytest.fixture(scope="module")
def brain_grid(mni_template):
    """The template on the CPU working grid: (x (1, 1, N, N, N), grid_affine, template)."""
    data, affine = mni_template
    grid_affine, grid_shape = working_grid(data.shape, affine, CPU["spacing_mm"], CPU["size"])
    x = to_working_grid(torch.as_tensor(data)[None, None], affine, grid_affine, grid_shape)
    return x, grid_affine, (data, affine)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return KeypointEncoder(**CPU["encoder"]).eval()


def lattice_symmetries():
    """The 48 signed permutation matrices P (v' = P v on centred voxel coordinates)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            P = np.zeros((3, 3))
            P[np.arange(3), perm] = signs
            out.append(P)
    return np.array(out)


def apply_symmetry(x, P):
    """x (B, C, N, N, N) -> y with y[v'] = x[P^T v'] about the grid centre (cubic grids)."""
    perm = [int(np.flatnonzero(row)[0]) for row in P]
    y = x.permute(0, 1, *(2 + p for p in perm))
    return torch.flip(y, [2 + a for a in range(3) if P[a, perm[a]] < 0])


def symmetry_errors(encoder, x, grid_affine, mats):
    """Keypoint errors (len(mats), K) in mm and weights (len(mats), K) under lattice symmetries."""
    with torch.no_grad():
        points, weights = encoder.keypoints(
            torch.cat([apply_symmetry(x, P) for P in mats]), grid_affine)
    centre = torch.as_tensor(grid_center(x.shape[2:], grid_affine))
    # The grid axes are world axes (isotropic, RAS), so a lattice symmetry P is P in world space.
    expected = (points[0] - centre) @ torch.as_tensor(mats).transpose(1, 2) + centre
    return (points - expected).norm(dim=-1), weights


def test_grid_symmetries_are_exactly_equivariant(mni_template):
    """All 24 grid rotations and their 24 mirror images, in float64 (slow on CPU, hence a 25^3
    grid of 8 mm): exact up to rounding (measured 6e-8 mm; below 1e-6 mm for seeds 0-2)."""
    data, affine = mni_template
    grid_affine, grid_shape = working_grid(data.shape, affine, 8.0, 25)
    x = to_working_grid(torch.as_tensor(data)[None, None], affine, grid_affine, grid_shape)
    mats = lattice_symmetries()
    assert sum(np.linalg.det(P) > 0 for P in mats) == 24
    torch.manual_seed(0)
    encoder = KeypointEncoder(**CPU["encoder"]).eval().double()
    error, weights = symmetry_errors(encoder, x.double(), grid_affine, mats)
    assert error.max() < 1e-5, f"max keypoint error {error.max():.2e} mm"
    assert torch.allclose(weights, weights[:1].expand_as(weights), rtol=1e-6,
                          atol=1e-12 * float(weights.max()))
    assert (weights[0] > 0).sum() >= weights.shape[1] // 2  # most maps carry mass


def test_grid_rotations_in_float32_at_the_cpu_preset(brain_grid, encoder):
    """The same in float32, as it runs: rounding moves keypoints by up to 2e-5 mm (measured), more
    on maps of almost no mass (up to 3e-3 mm on one with 1e-6 of the largest mass), which carry
    no weight in the rigid solve."""
    x, grid_affine, _ = brain_grid
    mats = lattice_symmetries()
    rotations = mats[np.linalg.det(mats) > 0]
    error, weights = symmetry_errors(encoder, x, grid_affine, rotations)
    relevant = weights[0] >= 1e-2 * weights[0].max()
    assert error[:, relevant].max() < 1e-4, f"max keypoint error {error.max():.2e} mm"
    assert float((error * weights).sum() / weights.sum()) < 1e-4


@pytest.mark.parametrize("which", ["random", "packaged"])
def test_continuous_rotations_are_approximately_equivariant(brain_grid, encoder, which):
    """8 random rotations of the template, each resampled once onto the working grid.

    Measured (weighted mean keypoint error): random weights (seed 0) 0.42 mm; the packaged image
    encoder 0.31 mm, whose keypoints then give the rotation within 2.5-7.1 degrees by Kabsch
    (the previous packaged weights: 0.13 mm, 1.1-3.8 degrees)."""
    x, grid_affine, (data, affine) = brain_grid
    if which == "packaged":
        from unimo_bids.unimo.network import load_network

        encoder = load_network().image_encoder
    gen = torch.Generator().manual_seed(1)
    rotation = roma.random_rotmat(8, dtype=torch.float64, generator=gen)
    centre = torch.as_tensor(grid_center(x.shape[2:], grid_affine))
    # Each pose is resampled once from the 2 mm template: anatomy at c + v moves to c + R v, so
    # the working grid reads the template at c + R^T (y - c).
    inverse = torch.eye(4, dtype=torch.float64).repeat(8, 1, 1)
    inverse[:, :3, :3] = rotation.transpose(1, 2)
    inverse[:, :3, 3] = centre - rotation.transpose(1, 2) @ centre
    moved = to_working_grid(torch.as_tensor(data)[None, None].expand(8, -1, -1, -1, -1), affine,
                            grid_affine, x.shape[2:], transforms=inverse)
    with torch.no_grad():
        p0, w0 = encoder.keypoints(x, grid_affine)
        p, w = encoder.keypoints(moved, grid_affine)
    expected = (p0 - centre) @ rotation.transpose(1, 2) + centre
    error = (p - expected).norm(dim=-1)  # (8, K) mm
    pair = pair_weights(w0, w)
    weighted = float((error * pair).sum() / pair.sum())
    print(f"{which} weights: weighted mean keypoint error {weighted:.3f} mm")
    assert weighted < {"random": 0.6, "packaged": 0.45}[which], f"{weighted:.3f} mm"
    # The mass of each map is a rotation invariant too (measured within 3.2 %).
    heavy = w0[0] > 0.1 * w0.max()
    assert torch.allclose(w[:, heavy], w0[:, heavy].expand(8, -1), rtol=0.05)
    if which == "packaged":
        found = rigid_from_keypoints(p0.expand(8, -1, -1), p, pair)[:, :3, :3]
        degrees = torch.rad2deg(roma.rotmat_geodesic_distance(found, rotation))
        print(f"packaged weights: rotation recovered within {degrees.min():.1f}-"
              f"{degrees.max():.1f} degrees")
        assert degrees.max() < 9.0, degrees


def test_keypoints_are_world_centres_of_mass():
    # An oblique, anisotropic grid: the affine, not the index, gives the world point.
    rot = roma.rotvec_to_rotmat(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rot @ torch.diag(torch.tensor([1.5, 2.0, 3.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-40.0, 12.0, 7.0])
    maps = torch.zeros(2, 3, 9, 11, 7)
    maps[0, 0, 2, 3, 4] = 5.0  # a single voxel
    maps[0, 1, 1, 1, 1] = 1.0  # two voxels, masses 1 and 3
    maps[0, 1, 5, 9, 1] = 3.0
    maps[1] = torch.rand(3, 9, 11, 7)
    maps[1, 2] = 0.0  # empty
    maps.requires_grad_(True)
    points, weights = keypoints(maps, affine, eps=0.0)

    def world(index):
        return affine[:3, :3] @ torch.tensor(index, dtype=torch.float64) + affine[:3, 3]

    assert torch.allclose(points[0, 0], world([2.0, 3.0, 4.0]), atol=1e-12)
    assert torch.allclose(points[0, 1], world([4.0, 7.0, 1.0]), atol=1e-12)
    assert torch.allclose(points[1, 2], world([4.0, 5.0, 3.0]), atol=1e-12)  # the grid centre
    assert weights[1, 2] == 0
    assert float(weights[0, 0].detach()) == pytest.approx(5.0 / (9 * 11 * 7))
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (9, 11, 7)],
                                       indexing="ij"), -1)
    mean = (maps[1, 0, ..., None].double() * index).sum((0, 1, 2)) / maps[1, 0].double().sum()
    assert torch.allclose(points[1, 0], world(mean.tolist()), atol=1e-10)
    # With the default prior mass an empty map keeps finite gradients.
    points, _ = keypoints(maps, affine)
    assert torch.allclose(points[1, 2], world([4.0, 5.0, 3.0]), atol=1e-12)
    assert torch.allclose(points[0, 1], world([4.0, 7.0, 1.0]), atol=1e-6)
    points.sum().backward()
    assert torch.isfinite(maps.grad).all()


def test_rigid_from_keypoints_follows_the_geometry_convention():
    gen = torch.Generator().manual_seed(5)
    rotation = roma.random_rotmat(3, dtype=torch.float64, generator=gen)
    translation = torch.randn(3, 3, generator=gen, dtype=torch.float64) * 10
    fixed = torch.randn(3, 16, 3, generator=gen, dtype=torch.float64) * 50
    moving = fixed @ rotation.transpose(1, 2) + translation[:, None]  # reference -> moving
    weights = pair_weights(torch.rand(3, 16, generator=gen), torch.rand(3, 16, generator=gen))
    M = rigid_from_keypoints(fixed.float(), moving.float(), weights)
    assert M.shape == (3, 4, 4) and M.dtype == torch.float64
    assert torch.allclose(M[:, :3, :3], rotation, atol=1e-5)
    assert torch.allclose(M[:, :3, 3], translation, atol=1e-3)
    assert torch.allclose(M[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64))


def test_working_grid_is_isotropic_cubic_and_centred(mni_template):
    data, affine = mni_template
    grid_affine, grid_shape = working_grid(data.shape, affine, 4.0, 49)
    assert grid_shape == (49, 49, 49)
    assert np.allclose(grid_affine[:3, :3], 4.0 * np.eye(3))
    assert np.allclose(grid_center(grid_shape, grid_affine), grid_center(data.shape, affine))
    mask = data > 0.5 * data.max()
    grid_affine, _ = working_grid(data.shape, affine, 4.0, 49, mask=mask)
    centroid = affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]
    assert np.allclose(grid_center(grid_shape, grid_affine), centroid)
    # spacing None: the cube spans the image's longest world extent.
    grid_affine, _ = working_grid(data.shape, affine, None, 33)
    extent = (np.asarray(data.shape) - 1) * np.abs(np.diag(affine)[:3])
    assert grid_affine[0, 0] * 32 == pytest.approx(extent.max())


def test_working_grid_handles_anisotropic_voxels(mni_template):
    """The same brain acquired with 2 x 2 x 5 mm voxels looks alike on the working grid."""
    data, affine = mni_template
    shape, thick = coarse_grid(data.shape, affine, 2.0, anisotropy=(1.0, 1.0, 2.5))
    maps = voxel_map(torch.eye(4, dtype=torch.float64)[None], torch.as_tensor(affine),
                     torch.as_tensor(thick))
    volume = torch.as_tensor(data)[None, None]
    thick_data = resample(volume, maps, shape)
    grid_affine, grid_shape = working_grid(data.shape, affine, 4.0, 49)
    iso = to_working_grid(volume, affine, grid_affine, grid_shape)
    aniso = to_working_grid(thick_data, thick, grid_affine, grid_shape)
    corr = np.corrcoef(iso.flatten().numpy(), aniso.flatten().numpy())[0, 1]
    assert corr > 0.99, corr  # measured 0.999
    torch.manual_seed(0)
    enc = KeypointEncoder(**CPU["encoder"]).eval()
    with torch.no_grad():
        p_iso, w = enc.keypoints(iso, grid_affine)
        p_aniso, _ = enc.keypoints(aniso, grid_affine)
    error = float(((p_iso - p_aniso).norm(dim=-1) * w).sum() / w.sum())
    assert error < 0.5, f"{error:.3f} mm"  # measured 0.07-0.14 mm (seeds 0-2)


def test_to_working_grid_applies_transforms_once(mni_template):
    data, affine = mni_template
    grid_affine, grid_shape = working_grid(data.shape, affine, 4.0, 33)
    shift = torch.eye(4, dtype=torch.float64)[None].clone()
    shift[0, 0, 3] = 4.0  # one working voxel: grid point y reads the template at y + 4 mm in x
    volume = torch.as_tensor(data)[None, None]
    base = to_working_grid(volume, affine, grid_affine, grid_shape)
    moved = to_working_grid(volume, affine, grid_affine, grid_shape, transforms=shift)
    assert torch.allclose(moved[0, 0, :-1], base[0, 0, 1:], atol=1e-4 * float(base.max()))


def test_encoder_shapes_zero_background_gradients_and_odd_sizes():
    torch.manual_seed(0)
    enc = KeypointEncoder(num_keypoints=5, widths=(2, 3), strides=(2, 1), diameter=(5, 3, 3))
    assert enc.scale == 2
    assert np.allclose(enc.maps_affine(np.eye(4))[:3, :3], 2 * np.eye(3))
    x = torch.zeros(2, 1, 17, 17, 17)
    assert enc(x).abs().max() == 0  # empty space carries no keypoint mass
    x[:, :, 5:12, 4:13, 6:11] = torch.rand(2, 1, 7, 9, 5)
    maps = enc(x)
    assert maps.shape == (2, 5, 9, 9, 9) and (maps >= 0).all()
    points, weights = enc.keypoints(x, np.eye(4))
    (points.sum() + weights.sum()).backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
    with pytest.raises(ValueError, match="stride-2"):
        enc(torch.zeros(1, 1, 16, 16, 16))


def test_dense_kernel_equals_e3nn_convolution():
    """Folding e3nn's self-connection into the centre tap is the same map as e3nn's forward."""
    torch.manual_seed(0)
    conv = SteerableConv3d("2x0e + 1x1o", "3x0e + 2x1o", lmax=2, diameter=5)
    x = torch.randn(2, 5, 9, 9, 9)
    assert torch.allclose(conv(x), Convolution.forward(conv, x), atol=1e-5)
    with torch.no_grad():  # cached kernel
        assert torch.allclose(conv(x), Convolution.forward(conv, x), atol=1e-5)
        conv.weight.mul_(2.0)  # an in-place update invalidates the cache
        assert torch.allclose(conv(x), Convolution.forward(conv, x), atol=1e-5)


def test_presets_and_helpers():
    assert preset("cpu") is PRESETS["cpu"] and preset("cuda:0") is PRESETS["cuda"]
    for config in PRESETS.values():
        enc = KeypointEncoder(**config["encoder"])
        assert config["size"] % enc.scale == 1  # the stride-2 layers stay centred
        assert 1_000 < sum(p.numel() for p in enc.parameters()) < 50_000
    window = spherical_window(9)
    assert window[4, 4, 4] == 1 and window[0, 0, 0] == 0 and window[0, 4, 4] == 0
    assert torch.equal(window, window.flip(0)) and torch.equal(window, window.transpose(0, 2))
    distance = torch.tensor([-30.0, -5.0, 0.0, 10.0, 25.0])
    assert torch.equal(shape_input(distance, 20.0), torch.tensor([40.0, 25.0, 20.0, 10.0, 0.0]))


def test_bfloat16_inference_moves_the_trained_keypoints_little_and_is_restored(brain_grid,
                                                                               monkeypatch):
    """inference_precision runs the convolutions in bfloat16 (no-grad passes only) and puts the
    previous setting back; the packaged image encoder's keypoints move by a small fraction of a
    working voxel (measured: 0.04 mm weighted mean on the template, 0.44 mm on the least
    weighted map)."""
    from unimo_bids.unimo.network import load_network

    encoder = load_network().image_encoder
    x, grid_affine, _ = brain_grid
    with torch.no_grad():
        points, weights = encoder.keypoints(x, grid_affine)
        with inference_precision(encoder, torch.bfloat16):
            fast_points, fast_weights = encoder.keypoints(x, grid_affine)
            with torch.enable_grad():  # training passes keep float32
                grad_points, _ = encoder.keypoints(x, grid_affine)
        again, _ = encoder.keypoints(x, grid_affine)
    shift = (fast_points - points).norm(dim=-1)[0]
    mean_shift = float((shift * weights[0]).sum() / weights[0].sum())
    print(f"bfloat16 keypoints: {mean_shift:.4f} mm weighted mean shift, "
          f"{float(shift.max()):.4f} mm largest")
    assert 0 < mean_shift < 0.1 * CPU["spacing_mm"]
    assert float((fast_weights - weights).abs().max()) < 0.05 * float(weights.max())
    assert torch.equal(grad_points.detach(), points) and torch.equal(again, points)
    assert fast_inference_dtype("cuda:0") == torch.float32
    monkeypatch.setenv("UNIMO_NETWORK_FLOAT32", "1")
    assert fast_inference_dtype("cpu") == torch.float32
