"""Known rigid motion (unimo.synthetic): matrices, random motions, simulated series and noise,
on nilearn's MNI152 template."""

from __future__ import annotations

import numpy as np
import pytest

from unimo_bids.unimo.synthetic import (
    add_noise,
    random_rigid_motions,
    rigid_matrix,
    simulate_series,
)


@pytest.fixture(scope="module")
def template():
    """nilearn's MNI152 template at 2 mm: (data float32, affine)."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    return np.asarray(img.get_fdata(), dtype=np.float32), img.affine


def apply(m: np.ndarray, x) -> np.ndarray:
    return (m @ np.append(np.asarray(x, float), 1.0))[:3]


def is_rigid(m: np.ndarray) -> bool:
    r = m[:3, :3]
    return (np.allclose(r @ r.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(r), 1.0)
            and np.allclose(m[3], [0, 0, 0, 1]))


# ---------------------------------------------------------------------------------------------
# matrices


def test_rigid_matrix_identity_and_right_handed_axes():
    assert np.allclose(rigid_matrix([0, 0, 0], [0, 0, 0], [5, 6, 7]), np.eye(4))
    # 90 deg about z takes +x to +y; about x takes +y to +z; about y takes +z to +x
    assert np.allclose(apply(rigid_matrix([0, 0, 90], [0, 0, 0]), [1, 0, 0]), [0, 1, 0])
    assert np.allclose(apply(rigid_matrix([90, 0, 0], [0, 0, 0]), [0, 1, 0]), [0, 0, 1])
    assert np.allclose(apply(rigid_matrix([0, 90, 0], [0, 0, 0]), [0, 0, 1]), [1, 0, 0])
    # pure translation
    assert np.allclose(apply(rigid_matrix([0, 0, 0], [1, -2, 3]), [4, 5, 6]), [5, 3, 9])


def test_rigid_matrix_order_center_and_inverse():
    rot, tra, c = [10.0, -20.0, 30.0], [1.5, -2.0, 4.0], np.array([3.0, -7.0, 11.0])
    m = rigid_matrix(rot, tra, c)
    assert is_rigid(m)
    # R = Rz @ Ry @ Rx: x first, then y, then z
    rx, ry, rz = (rigid_matrix(a, [0, 0, 0]) for a in ([10, 0, 0], [0, -20, 0], [0, 0, 30]))
    assert np.allclose(m[:3, :3], (rz @ ry @ rx)[:3, :3])
    # x -> R (x - c) + c + t: the centre goes to c + t, and a point at c + v to c + t + R v
    assert np.allclose(apply(m, c), c + tra)
    v = np.array([10.0, 0.0, -5.0])
    assert np.allclose(apply(m, c + v), c + tra + m[:3, :3] @ v)
    # same rotation about another centre differs only by a translation
    m0 = rigid_matrix(rot, tra)
    assert np.allclose(m0[:3, :3], m[:3, :3])
    assert np.allclose(m[:3, 3] - m0[:3, 3], c - m[:3, :3] @ c)
    # inverse: rotation -R^T-, and composition of opposite translations is the identity
    inv = np.linalg.inv(m)
    assert is_rigid(inv) and np.allclose(inv[:3, :3], m[:3, :3].T)
    assert np.allclose(rigid_matrix([0, 0, 0], [1, 2, 3]) @ rigid_matrix([0, 0, 0], [-1, -2, -3]),
                       np.eye(4))
    # rotations about the same axis and centre compose by adding angles
    about_c = [rigid_matrix([0, 0, a], [0, 0, 0], c) for a in (25, 15, 40)]
    assert np.allclose(about_c[0] @ about_c[1], about_c[2])


def test_random_rigid_motions():
    c = np.array([0.0, -18.0, 18.0])
    ms = random_rigid_motions(20, 5.0, 3.0, c, np.random.default_rng(0))
    assert ms.shape == (20, 4, 4)
    assert np.allclose(ms[0], np.eye(4))
    assert all(is_rigid(m) for m in ms)
    shifts = np.array([apply(m, c) - c for m in ms])  # translation of the centre = t
    assert np.abs(shifts).max() <= 3.0 and np.abs(shifts).max() > 1.0
    angles = np.degrees(np.arccos(np.clip((np.trace(ms[:, :3, :3], axis1=1, axis2=2) - 1) / 2,
                                          -1, 1)))
    assert angles.max() <= np.sqrt(3) * 5.0 + 1e-9 and angles[1:].min() > 0
    again = random_rigid_motions(20, 5.0, 3.0, c, np.random.default_rng(0))
    assert np.array_equal(ms, again)  # reproducible from the generator


# ---------------------------------------------------------------------------------------------
# simulated series


def test_identity_reproduces_the_image(template):
    image, affine = template
    out = simulate_series(image, affine, np.eye(4)[None], image.shape, affine)
    assert out.shape == image.shape + (1,) and out.dtype == np.float32
    assert np.allclose(out[..., 0], image, atol=1e-5)
    # on a grid of every other voxel: the image subsampled, exactly
    coarse = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    shape = tuple((n + 1) // 2 for n in image.shape)
    out = simulate_series(image, affine, np.eye(4)[None], shape, coarse)
    assert np.allclose(out[..., 0], image[::2, ::2, ::2], atol=1e-5)


def test_integer_voxel_translation_shifts_exactly(template):
    image, affine = template
    k = (3, -2, 5)  # voxels; the template's affine is diag(2, 2, 2): 2 mm per voxel
    assert np.allclose(np.diag(affine)[:3], 2.0)
    motion = rigid_matrix([0, 0, 0], 2.0 * np.array(k))
    out = simulate_series(image, affine, np.stack([np.eye(4), motion]), image.shape, affine)
    moved = out[..., 1]
    # volume(v) = image(v + k): the anatomy appears shifted by -k
    expected = np.zeros_like(image)
    src = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(k, image.shape))
    dst = tuple(slice(max(-s, 0), n + min(-s, 0)) for s, n in zip(k, image.shape))
    expected[dst] = image[src]
    assert np.allclose(moved, expected, atol=1e-5)
    assert np.allclose(out[..., 0], image, atol=1e-5)


def test_motion_convention_with_a_blob(template):
    """A feature at world point y in the image appears at inv(motions[t]) @ y in volume t."""
    _, affine = template
    shape = (60, 70, 60)
    ijk = np.indices(shape).reshape(3, -1).T
    world = (affine[:3, :3] @ ijk.T).T + affine[:3, 3]
    y = np.array([-35.0, -60.0, -12.0])  # well inside the grid: the blob is not truncated
    blob = np.exp(-np.sum((world - y) ** 2, axis=1) / (2 * 4.0 ** 2)).reshape(shape)
    motion = rigid_matrix([8.0, -5.0, 12.0], [3.0, -4.0, 2.5], [-40.0, -70.0, -20.0])
    out = simulate_series(blob, affine, motion[None], shape, affine)[..., 0]
    w = out.ravel() / out.sum()
    centroid = (world * w[:, None]).sum(axis=0)
    assert np.allclose(centroid, apply(np.linalg.inv(motion), y), atol=1e-3)  # measured 3e-6
    assert not np.allclose(centroid, apply(motion, y), atol=1.0)


def test_series_orders_and_outside_is_zero(template):
    image, affine = template
    motions = random_rigid_motions(3, 10.0, 20.0, [0, -18, 18], np.random.default_rng(2))
    shape = (40, 48, 40)
    grid = affine @ np.diag([2.5, 2.5, 2.5, 1.0])
    cubic = simulate_series(image, affine, motions, shape, grid)
    linear = simulate_series(image, affine, motions, shape, grid, order=1)
    assert cubic.shape == linear.shape == shape + (3,)
    assert linear.min() >= 0 and linear.max() <= image.max() + 1e-6  # no overshoot
    assert np.abs(cubic - linear).mean() < 0.02 * image.max()
    # far outside the image: a shift of more than the field of view reads 0
    away = simulate_series(image, affine, rigid_matrix([0, 0, 0], [500, 0, 0])[None], shape,
                           grid)
    assert not away.any()


# ---------------------------------------------------------------------------------------------
# noise


def test_add_noise_level_and_rician(template):
    image, _ = template
    rng = np.random.default_rng(5)
    noisy = add_noise(image, 20.0, rng, rician=False)
    assert noisy.shape == image.shape and noisy.dtype == np.float32
    level = np.median(image[image > 0.1 * np.percentile(image, 99)])
    assert np.std(noisy - image) == pytest.approx(level / 20.0, rel=0.02)
    rician = add_noise(image, 20.0, np.random.default_rng(5))
    assert rician.min() >= 0
    background = rician[image == 0]  # Rayleigh: mean sigma * sqrt(pi / 2)
    assert background.mean() == pytest.approx(level / 20.0 * np.sqrt(np.pi / 2), rel=0.03)
    assert np.array_equal(rician, add_noise(image, 20.0, np.random.default_rng(5)))
